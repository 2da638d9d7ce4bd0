"""The step loop and its bookkeeping: engine, scheduler, block manager, sequences, model runner, sampler,
speculative decoding. No I/O and no argument parsing."""
