"""What a conformance check reports."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field


@dataclass
class CheckResult:
    """The outcome of one conformance check of one plugin component.

    ``kind`` is ``"attention_backend"``, ``"quantization_method"``, ``"platform"`` or
    ``"model_family"``. A check that cannot run on this machine (a CUDA-only backend on a
    CPU) has ``skipped_reason`` set and ``passed`` False; a check that ran has
    ``passed`` True exactly when ``failures`` is empty. ``checked`` lists the cases that
    ran, for reports."""

    name: str
    kind: str
    passed: bool = False
    skipped_reason: str | None = None
    failures: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.skipped_reason is not None

    def raise_for_failures(self) -> None:
        """Raise ``AssertionError`` listing the failures (nothing when there are none,
        including when the check was skipped: test ``skipped_reason`` for that)."""
        if self.failures:
            listing = "\n".join(f"- {failure}" for failure in self.failures)
            raise AssertionError(
                f"{self.kind} {self.name!r} failed {len(self.failures)} conformance "
                f"check(s):\n{listing}"
            )

    def summary(self) -> str:
        """One line: PASS / SKIP / FAIL, the subject, and the reason or failure count."""
        subject = f"{self.kind} {self.name!r}"
        if self.failures:
            return f"FAIL {subject}: {len(self.failures)} failure(s); first: {self.failures[0]}"
        if self.skipped_reason is not None:
            return f"SKIP {subject}: {self.skipped_reason}"
        return f"PASS {subject} ({len(self.checked)} case(s))"


class Checker:
    """Collects failures; ``finish`` turns them into a ``CheckResult``."""

    def __init__(self, name: str, kind: str) -> None:
        self.result = CheckResult(name=name, kind=kind)

    def fail(self, message: str) -> None:
        self.result.failures.append(message)

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.fail(message)
        return ok

    def crashed(self, where: str, exc: BaseException) -> None:
        """Record an exception raised by the plugin as a failure (the check goes on)."""
        frames = traceback.extract_tb(exc.__traceback__)
        origin = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        self.fail(f"{where} raised {type(exc).__name__}: {exc}{origin}")

    def skip(self, reason: str) -> CheckResult:
        self.result.skipped_reason = reason
        return self.finish()

    def finish(self) -> CheckResult:
        result = self.result
        if result.failures:
            result.skipped_reason = None
        result.passed = not result.failures and result.skipped_reason is None
        return result
