"""The space of one message lent to the caller (``ShmTransport.loan_message``): a ring
record, or an out-of-line block with its reference record in the ring."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ... import _core

if TYPE_CHECKING:
    from ._ring import ShmTransport

__all__ = ["_BlockLoan", "_RingLoan"]


class _Lent:
    """A message's space lent to the caller (``ShmTransport.loan_message``): ``buffer``
    is what follows the frame header ``prefix``, ``nbytes`` the whole record."""

    __slots__ = ("_lent", "_whole", "buffer", "nbytes")

    def __init__(self, lent: _core.Loan, prefix: bytes) -> None:
        self._lent = lent
        whole = self._whole = memoryview(lent)
        self.nbytes = whole.nbytes
        whole[: len(prefix)] = prefix
        self.buffer: memoryview | None = whole[len(prefix) :]

    def _views_released(self) -> bool:
        """Release our views; False if the caller still holds views of the buffer."""
        try:
            if self.buffer is not None:
                self.buffer.release()
            self._whole.release()
        except BufferError:
            return False
        finally:
            self.buffer = None
        return True


class _RingLoan(_Lent):
    """The space lent in the ring: the record itself."""

    __slots__ = ("_loan",)

    def __init__(self, loan: _core.Loan, prefix: bytes) -> None:
        super().__init__(loan, prefix)
        self._loan: _core.Loan | None = loan

    def commit(self) -> None:
        loan, self._loan = self._loan, None
        if loan is None:
            raise ValueError("the loan is already finished")
        if not self._views_released():
            raise BufferError(_STILL_VIEWED)  # aborted when those views are collected
        try:
            loan.commit()
        except BufferError:  # views of views (numpy keeps its own memoryview)
            raise BufferError(_STILL_VIEWED) from None

    def abort(self) -> None:
        loan, self._loan = self._loan, None
        if loan is not None and self._views_released():
            with contextlib.suppress(BufferError):  # else aborted when the views go
                loan.abort()


class _BlockLoan(_Lent):
    """The space lent in an out-of-line block; the ring carries ``ref``, its name."""

    __slots__ = ("_block", "_kind", "_ref", "_transport")

    def __init__(
        self,
        transport: ShmTransport,
        ref: _core.Loan,
        block: _core.Block,
        kind: int,
        view: _core.BlockView,
        prefix: bytes,
    ) -> None:
        super().__init__(view, prefix)
        self._transport = transport
        self._ref: _core.Loan | None = ref
        self._block = block
        self._kind = kind

    def _views_released(self) -> bool:
        if not super()._views_released():
            return False
        try:
            self._lent.release()  # the block view itself
        except BufferError:
            return False
        return True

    def commit(self) -> None:
        ref, self._ref = self._ref, None
        if ref is None:
            raise ValueError("the loan is already finished")
        if not self._views_released():
            ref.abort()
            self._transport._give_back(self._block, self._kind, lent=True)
            raise BufferError(_STILL_VIEWED)
        self._transport._commit_ref(ref, self._block, self._kind, self.nbytes)

    def abort(self) -> None:
        ref, self._ref = self._ref, None
        if ref is None:
            return
        ref.abort()
        self._transport._give_back(self._block, self._kind, lent=not self._views_released())


_STILL_VIEWED = (
    "views of the loan are still alive (an array made from it?): delete them before the "
    "loan ends; the message was not sent"
)
