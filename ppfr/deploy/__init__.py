"""Deployment, one job per room (imports point down the list):

* ``protocol``  the payload contract every side checks (``validate``), the JSON codec, the one L2 rule
* ``wire``      the binary wire format (``application/x-ppfr``)
* ``gallery/``  stores of enrolled identities (sqlite, qdrant, the legacy npz), ``open_gallery(uri)``
* ``export/``   ONNX, TensorRT, Triton Inference Server repositories, metadata; ``ppfr export``
* ``runtime/``  runners over eager / ONNX Runtime / TensorRT / a Triton server; ``load_runner``
* ``api``       the HTTP interface as data (endpoints, OpenAPI)
* ``server/``   the recognition server: service, batching worker, admission, stdlib and ASGI stacks; ``ppfr serve``
* ``client``    the client SDK; ``ppfr client``

Nothing is imported eagerly: onnx, onnxruntime, tensorrt, fastapi and the stores' libraries load only when used.
"""
