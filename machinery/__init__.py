"""machinery: what a real run needs and the paper does not describe. A reader of the paper may skip it.

The concept files (cql_multigame.py, replay.py, record.py, resnet.py, atari.py, finetune_*.py) hold the
method; this package holds the engineering that lets the same scripts run from a laptop CPU to a TPU pod and
survive being stopped:

- devices.py      devices and processes: torchrun DDP, torch-xla (one process per device, or SPMD), the
                  batch prefetcher (BatchStream), batched device -> host copies
- runs.py         the run folder (Run: TensorBoard, metrics.jsonl, evaluation tables), one writer per folder
                  (RunLock), SIGINT/SIGTERM as a clean stop (StopSignals), one-line errors (run_script)
- checkpoints.py  atomic checkpoint files, one-sentence load errors, --resume comparisons, full disks
- flags.py        the allowed range of every script's numeric flags (FLAG_RANGES), ConfigError
- dqn_files.py    DQN-Replay file I/O: the gzip/npy reader and writer, scanning and validating checkpoints
- streaming.py    MultiGameReplay's streaming: slots, windows, background loads, the memory plan

It never imports a concept file (lazy imports included); its functions take the values they need, not a
script's whole Args. The concept files re-export the names users call (e.g. replay.write_checkpoint,
cql_multigame.select_device).
"""
