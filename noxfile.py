"""nox sessions: `nox -s tests` runs the test suite, `nox -s lint` checks style."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    # The CPU build of torch first: a bare `torch` requirement may pull a multi-GB CUDA build.
    session.install("torch==2.13.0")
    session.install("-e", ".[dev,qlora]", "torch==2.13.0")
    session.install("--no-build-isolation", "deepspeed", "torch==2.13.0", env={"DS_BUILD_OPS": "0"})
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "qwenvl_cli", "tests", "benchmarks", "scripts", "noxfile.py")
    session.run("ruff", "format", "--check", "qwenvl_cli", "tests", "benchmarks", "scripts", "noxfile.py")
