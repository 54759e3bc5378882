"""The pieces the command files (``train``, ``test``, ``infer``, ``tune``, ``benchmark``) share.

- :mod:`~raydet.commands.sections`: the pipeline's non-model sections as typed settings; the datasets; work dirs.
- :mod:`~raydet.commands.validation`: the whole pipeline checked on the driver before Ray starts.
- :mod:`~raydet.commands.ray_setup`: logging, Ray start-up (and a quiet console), cluster resource checks, Ray
  Train's configs.
- :mod:`~raydet.commands.loaders`: each worker's Ray Data streams.
- :mod:`~raydet.commands.runner_builder`: a pipeline's Runner (model, optimizer, hooks) in one process.
- :mod:`~raydet.commands.restart_notice`: one console line when Ray Train restarts failed workers.
"""
