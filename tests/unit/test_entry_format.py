"""The entry format: the header line, the Signer, and atomic writes, on a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from juicecache.entryfile import EntryHeader, EntryRefused, Signer, read_header, write_atomically


def header(signer: Signer, name: str, content: bytes) -> EntryHeader:
    return EntryHeader(len(content), signer.digest(name, content), signer.algorithm, signer.key_id, "host", 1.0, "task")


def test_a_header_round_trips_and_old_headers_still_read() -> None:
    line = header(Signer(), "data/k", b"x").to_line()
    assert EntryHeader.from_line(line).size == 1
    old = b'JCE1 {"algorithm":"sha256","created":1.0,"digest":"d","host":"h","key_id":null,"size":1,"task":null}\n'
    assert EntryHeader.from_line(old).code is None  # written before the code and seconds fields


@pytest.mark.parametrize("line", [b"", b"garbage\n", b"JCE1 {not json}\n", b'JCE1 {"size": 1}\n', b"JCE1 {}"])
def test_a_bad_header_is_refused(line: bytes) -> None:
    with pytest.raises(EntryRefused):
        EntryHeader.from_line(line)


def test_the_digest_binds_content_and_name() -> None:
    signer = Signer()
    checked = header(signer, "data/k", b"payload")
    signer.check("data/k", checked, b"payload")
    with pytest.raises(EntryRefused, match="checksum mismatch"):
        signer.check("data/k", checked, b"payloaX")
    with pytest.raises(EntryRefused, match="checksum mismatch"):
        signer.check("data/other", checked, b"payload")  # moved to another entry
    with pytest.raises(EntryRefused, match="truncated"):
        signer.check("data/k", checked, b"pay")


def test_signatures_need_the_same_key() -> None:
    signed = header(Signer(b"key-one"), "data/k", b"v")
    Signer(b"key-one").check("data/k", signed, b"v")
    with pytest.raises(EntryRefused, match="signed with another key"):
        Signer(b"key-two").check("data/k", signed, b"v")
    with pytest.raises(EntryRefused, match="JUICECACHE_SIGNING_KEY is not set here"):
        Signer().check("data/k", signed, b"v")
    with pytest.raises(EntryRefused, match="not signed"):
        Signer(b"key-one").check("data/k", header(Signer(), "data/k", b"v"), b"v")


def test_an_atomic_write_leaves_no_temporary_and_replaces_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "records" / "k"
    first = write_atomically(target, [header(Signer(), "records/k", b"one").to_line(), b"one"])
    second = write_atomically(target, [header(Signer(), "records/k", b"two").to_line(), b"two"])
    assert first != second == os.stat(target).st_ino  # a new file under the name
    assert os.listdir(target.parent) == ["k"]
    assert read_header(target).size == 3
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
