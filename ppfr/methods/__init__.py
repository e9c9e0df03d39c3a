"""Method plugins: ``build_method(name, **options)``; see ppfr.methods.base for the protocol."""

from ppfr.methods.base import (
    FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, available_methods, build_method,
    load_method, method_class, register_method,
)  # fmt: skip

__all__ = ["FreqPayloadOperator", "Method", "MethodOptions", "Payload", "Stage", "TensorSpec", "available_methods",
           "build_method", "load_method", "method_class", "register_method"]  # fmt: skip
