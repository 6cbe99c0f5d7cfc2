"""Benchmarks: programs that print figures (they never assert timings).

    speed           `glasslstm bench speed`: glasslstm against torch.nn.LSTM (and JAX when
                    installed): training, inference, the one-token step, generation
    memory          `glasslstm bench memory` / `gradient`: the long-term-memory tasks, LSTM
                    against GRU and vanilla RNN, and the vanishing gradient
    timing          the timing helpers every benchmark shares (same-run ratios, medians)
    engine_speed    python -m glasslstm.bench.engine_speed: one layer, every backend
    memory_peak     python -m glasslstm.bench.memory_peak: peak memory against T (checkpoint=)
    shakespeare_char  python -m glasslstm.bench.shakespeare_char: the tiny-shakespeare model
    gpu_check       python -m glasslstm.bench.gpu_check: the GPU path against cuDNN
    gpu_session.sh  all GPU checks in one command under a time limit

Figures, the machines and the commands that produced them: docs/benchmarks.md.
"""
