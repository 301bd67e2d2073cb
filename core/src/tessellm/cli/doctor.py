"""``tessellm doctor``: the conformance checks of ``tessellm.testing`` on every installed plugin.

One line per check (PASS, FAIL with the reasons, SKIP with the reason), grouped by plugin
with its distribution and version; plugins refused at discovery are failures too. The
exit code is 1 when anything failed, so CI can run it on the machine it deploys to.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from tessellm.cli.common import fail

if TYPE_CHECKING:
    from tessellm.plugins import PluginSet

# Kinds of registration with a conformance check, and the words for them.
CHECKED_KINDS = {
    "platforms": "platform",
    "attention_backends": "attention backend",
    "quantization_methods": "quantization method",
    "models": "model family",
}
# Registrations that are not components to check (metadata, CLI).
NOT_COMPONENTS = {"install_hints", "commands"}
MAX_REASONS = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # "PASS", "FAIL" or "SKIP"
    subject: str  # e.g. "attention backend 'torch'"
    detail: str = ""

    def line(self) -> str:
        return f"  {self.status}  {self.subject}" + (f": {self.detail}" if self.detail else "")


def doctor(
    plugin: Annotated[
        str | None,
        typer.Option(help="Check only this plugin (entry-point or distribution name)."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Let the checks' own output through.")
    ] = False,
) -> None:
    """Run the conformance checks on the installed plugins; exit 1 if any fails.

    Every platform, attention backend, quantization method and model family an installed
    plugin registered is checked with tessellm.testing; plugins refused at discovery count
    as failures."""
    from tessellm.plugins import get_plugins

    found = get_plugins()
    names = list(found.plugins) + [n for n in found.failures if n not in found.plugins]
    if plugin is not None:
        names = [n for n in names if plugin in (n, _distribution(found, n))]
        if not names:
            fail(f"no plugin named {plugin!r} is installed (see `tessellm plugins`)", code=2)
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for name in names:
        info = found.plugins.get(name)
        if info is None:
            version = "refused at discovery"
        elif info.distribution == "(in process)":
            version = "registered in process"
        else:
            version = f"{info.distribution} {info.version}"
        typer.echo(f"{name}  ({version})")
        outcomes = []
        if name in found.failures:
            outcomes.append(Outcome("FAIL", "plugin", found.failures[name]))
        if name in found.warnings:
            typer.echo(f"  note  {found.warnings[name]}")
        if info is not None:
            outcomes += _check_registrations(found, name, info.registered, verbose)
        for outcome in outcomes:
            counts[outcome.status] += 1
            typer.echo(outcome.line())
    typer.echo(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    raise typer.Exit(1 if counts["FAIL"] else 0)


def _distribution(found: PluginSet, name: str) -> str | None:
    info = found.plugins.get(name)
    return info.distribution if info else None


def _check_registrations(
    found: PluginSet, plugin: str, registered: list[tuple[str, str]], verbose: bool
) -> list[Outcome]:
    outcomes = []
    unchecked = []
    for kind, name in registered:
        if kind in NOT_COMPONENTS:
            continue
        if kind not in CHECKED_KINDS:
            unchecked.append(f"{kind.rstrip('s').replace('_', ' ')} {name!r}")
            continue
        subject = f"{CHECKED_KINDS[kind]} {name!r}"
        winner = found.get(kind, name)
        if winner is not None and winner.plugin != plugin:
            outcomes.append(Outcome("SKIP", subject, f"overridden by {winner.plugin}"))
            continue
        outcomes.append(_run_check(kind, name, subject, verbose))
    if unchecked:
        detail = "no conformance check for these kinds"
        outcomes.append(Outcome("SKIP", ", ".join(unchecked), detail))
    return outcomes


def _run_check(kind: str, name: str, subject: str, verbose: bool) -> Outcome:
    import tessellm.testing as kit

    # A family whose architecture transformers does not know is skipped by the check itself
    # (no reference to compare with) before any model is built.
    checks: dict[str, Callable] = {
        "platforms": kit.check_platform,
        "attention_backends": kit.check_attention_backend,
        "quantization_methods": kit.check_quantization_method,
        "models": kit.check_model_family,
    }
    try:
        # The engines and transformers that a check runs log progress bars and warnings;
        # the report is the line below, so they are kept out of it.
        with contextlib.nullcontext() if verbose else _quiet():
            result = checks[kind](name)
    except Exception as exc:  # a check must not take the others down
        return Outcome("FAIL", subject, f"the check raised {exc!r}")
    if result.skipped_reason:
        return Outcome("SKIP", subject, result.skipped_reason)
    if result.passed and not result.failures:
        return Outcome("PASS", subject)
    return Outcome("FAIL", subject, _reasons(result.failures))


def _reasons(failures: list[str]) -> str:
    """The first few failures on one line (a check may report dozens of cases)."""
    if not failures:
        return "failed (no reason given)"
    shown = [" ".join(failure.split()) for failure in failures[:MAX_REASONS]]
    more = len(failures) - len(shown)
    return "; ".join(shown) + (f" (+{more} more)" if more else "")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
