"""Build glue for the one C extension, mqrt.lib._atomic; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mqrt.lib._atomic",
            sources=["mqrt/lib/_atomic.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
