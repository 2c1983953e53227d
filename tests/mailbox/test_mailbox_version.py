"""The acknowledgement table's REPLY_TO ``"#"`` across versions (docs/mailboxes.md,
"Versions"): a mailbox made by this version says in its label that its receivers
understand ``"#"`` (last word ``tables``), which buzon before the tables refuses to
open; in a mailbox made by older buzon (no such word), whose receivers may not know
``"#"``, ``send_async`` names the acknowledgement ring itself, which every version
understands, so the receipt resolves whoever takes the message."""

from __future__ import annotations

import os
import struct

import pytest

import buzon
from buzon import _mailbox
from buzon.protocol.frames import Field, parse_frame
from buzon.shm._segment import attach_ring

T = 10.0
_ACK = struct.Struct("<QII")


def _old_label(policy: str, capacity: int | None, max_inline: int, raw: bool = False) -> str:
    """The label buzon before the tables wrote (no last word for a mailbox of objects)."""
    cap = "none" if capacity is None else capacity
    return f"mailbox {policy} {cap} {max_inline}" + (" raw" if raw else "")


def test_a_new_mailbox_says_its_receivers_know_the_table_and_a_raw_one_is_unchanged() -> None:
    box = buzon.mailbox("ver-new", capacity=8)
    bb = buzon.BoundedBuffer("ver-bb", 4, 16)
    try:
        assert box._ring.info()["label"] == "mailbox any 8 1024 tables"
        assert bb._ring.info()["label"] == "mailbox any 4 16 raw"  # (no receipts there)
        assert box.send_async(b"x") is not None
        assert box.recv(T) == b"x"
    finally:
        box.remove()
        bb.remove()


def test_in_an_older_versions_mailbox_a_receipt_names_the_ring_an_old_receiver_can_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as m:  # made by buzon before the tables
        m.setattr(_mailbox, "_label", _old_label)
        made = buzon.mailbox("ver-old", capacity=8)
    sender = buzon.mailbox("ver-old")
    try:
        assert made._ring.info()["label"] == "mailbox any 8 1024"
        receipt = sender.send_async(b"job")
        # the receiver of the older version: it takes the record and writes the
        # acknowledgement into the ring REPLY_TO names (it knows nothing of "#")
        frame = parse_frame(made._ring.recv(T), 1 << 20)
        assert frame.receipt and frame.fields is not None
        reply_to = frame.fields[Field.REPLY_TO]
        assert not reply_to.startswith(b"#"), reply_to
        message_id = struct.unpack("<Q", frame.fields[Field.MESSAGE_ID])[0]
        ring = attach_ring(reply_to.decode("ascii"))
        try:
            ring.send(_ACK.pack(message_id, 4242, os.getuid()), T)
        finally:
            ring.close()
        assert receipt.wait(T).pid == 4242
        # and a receiver of this version in the same mailbox acknowledges it as well
        again = sender.send_async(b"job 2")
        assert made.recv(T) == b"job 2"
        assert again.wait(T).pid == os.getpid()
    finally:
        sender.close()
        made.remove()
