"""The pieces the command files (``train``, ``test``, ``infer``, ``tune``, ``benchmark``) share.

- :mod:`~raydet.commands.sections`: the pipeline's non-model sections as typed settings; the datasets; work dirs.
- :mod:`~raydet.commands.ray_setup`: logging, Ray start-up, cluster resource checks, Ray Train's configs.
- :mod:`~raydet.commands.loaders`: each worker's Ray Data streams.
- :mod:`~raydet.commands.runner_builder`: a pipeline's Runner (model, optimizer, hooks) in one process.
"""
