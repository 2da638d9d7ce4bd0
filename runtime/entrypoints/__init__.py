"""The ways in: command line, OpenAI batch files, benchmarks."""
