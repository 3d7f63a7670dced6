"""Memory per GPU and step time at N GPUs, planned before launch (``python -m pretrain plan``).

- ``states``: what DeepSpeed allocates per rank for parameters, gradients and optimizer states,
  read from the generated DeepSpeed config (checked byte for byte against real engines);
- ``activations``: one forward/backward of the real model on fake tensors;
- ``network``: collective volume per step and its time at a bus bandwidth;
- ``planner``: the peak of a rank (forward/backward, optimizer step, start-up), the largest
  micro-batch that fits, the step time;
- ``report``: the command's table and JSON; ``check``: ``pretrain train``'s start-up check.
"""
