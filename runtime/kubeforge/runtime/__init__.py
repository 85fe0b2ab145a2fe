"""kubeforge's data plane: the code that runs inside the training, quantization and serving pods.

It never imports the operator (``kubeforge.api``, ``planner``, ``render``, ``controller``);
the only thing both sides share is ``kubeforge.runtime.contract``.
"""
