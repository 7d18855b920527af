"""Build glue for the C extensions (mqrt.lib._atomic, the word-level atomics;
mqrt.block._rq, a request's hot steps on the shared pool; mqrt.workers._jobsink, an fio
job's bi_end_io; and mqrt.device._nvme_engine, the NVMe controller's I/O command path);
everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mqrt.lib._atomic",
            sources=["mqrt/lib/_atomic.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "mqrt.block._rq",
            sources=["mqrt/block/_rq.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "mqrt.workers._jobsink",
            sources=["workers/_jobsink.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "mqrt.device._nvme_engine",
            sources=["device/_nvme_engine.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            libraries=["m", "pthread"],
        ),
    ]
)
