"""The application tier: what each ``--mode`` of ``diffjax.main`` does, given an Experiment.

One module per mode (:mod:`~diffjax.app.train`, :mod:`~diffjax.app.sample`,
:mod:`~diffjax.app.evaluate`, :mod:`~diffjax.app.summary`), each a ``run(experiment, ...)``
that orchestrates the trainer, generation and evaluation metrics. Callable (and tested)
without flags; nothing here reads a ConfigDict.
"""
