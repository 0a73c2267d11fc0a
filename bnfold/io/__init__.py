"""What comes in and what goes out, checked before anything runs.

* :mod:`~bnfold.io.models`      — load a model file (``.pt2`` inspected before loading, trusted pickles);
* :mod:`~bnfold.io.pt2_inspect` — a ``.pt2`` read once into memory and every member classified;
* :mod:`~bnfold.io.data`        — input tensors from files (``.pt``, ``.npy``, ``.npz``), split into batches;
* :mod:`~bnfold.io.images`      — a folder of images decoded and preprocessed batch by batch (``--preprocess``);
* :mod:`~bnfold.io.stream`      — every data source (files, memory-mapped ``.npy``, image folders,
  ``--data-factory``) as a re-iterable stream of batches, each checked as it arrives;
* :mod:`~bnfold.io.data_checks` — batches against the model's inputs, and the model run once on them;
* :mod:`~bnfold.io.outputs`     — output paths checked up front, atomic writes, staging folders.

Writing a model (``.pt2``, ONNX, a TVM folder) is a target's job (:mod:`bnfold.targets`).
"""
