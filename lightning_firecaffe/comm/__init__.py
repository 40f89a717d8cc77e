"""Gradient communication, bottom-up: pure schedules and their registry, cost model, simulator, dataflow
plans, the runners (dataflow on gloo, lock-step on NCCL) and executor, compression, the tuner, the hook."""
