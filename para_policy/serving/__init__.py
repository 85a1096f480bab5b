"""Serving a policy to robots over the network (docs/serving.md).

``protocol`` (the wire contract) and ``wire`` (the strict safetensors + JSON codec) and ``client``
(:class:`~para_policy.serving.client.RemoteController`) import no torch: they are what the robot
runs. ``server`` (``serve``, ``PolicyServer``) and ``launch`` (a server child process) run where
the policy is. Nothing is imported here, so ``import para_policy.serving.client`` stays light.
"""
