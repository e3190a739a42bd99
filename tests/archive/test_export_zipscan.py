"""Listing a zip that was never closed from its local headers (popbox.archive.zipscan),
as an eml-zip export resumed after SIGKILL does: ZIP64 entries included, and a cut in
the middle of an entry refused rather than guessed at."""

from __future__ import annotations

import io
import zipfile

import pytest

from popbox.archive.zipscan import read_local_entries
from popbox.errors import ArchiveError

ENTRIES = [
    ("2020-01-06_090000_1.eml", b"Subject: one\r\n\r\nbody\r\n", False),
    ("2020-01-06_090100_2.eml", b"Subject: two\n\n" + b"x" * 100_000, True),
    ("2020-01-06_090200_3.eml", b"", False),
]


def _unclosed_zip() -> tuple[bytes, list[int]]:
    """A zip's bytes as a killed writer leaves them (no directory), and where each
    entry ended."""
    buffer = io.BytesIO()
    writer = zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
    ends = []
    for name, data, zip64 in ENTRIES:
        with writer.open(
            zipfile.ZipInfo(name, (2020, 1, 6, 9, 0, 0)), "w", force_zip64=zip64
        ) as out:
            out.write(data)
        ends.append(buffer.tell())
    snapshot = buffer.getvalue()[: ends[-1]]
    writer.close()
    return snapshot, ends


def test_entries_of_an_unclosed_zip_are_listed_and_a_directory_completes_it() -> None:
    data, ends = _unclosed_zip()
    fp = io.BytesIO(data)
    infos = read_local_entries(fp, ends[-1])
    assert [info.filename for info in infos] == [name for name, _, _ in ENTRIES]
    assert [info.file_size for info in infos] == [len(data) for _, data, _ in ENTRIES]
    fp.seek(ends[-1])
    resumed = zipfile.ZipFile(fp, "w", zipfile.ZIP_DEFLATED, allowZip64=True)
    resumed.filelist.extend(infos)
    resumed.writestr("2020-01-06_090300_4.eml", b"Subject: four\n\n")
    resumed.close()
    with zipfile.ZipFile(io.BytesIO(fp.getvalue())) as complete:
        assert complete.testzip() is None
        assert [complete.read(name) for name, _, _ in ENTRIES] == [d for _, d, _ in ENTRIES]
        assert complete.read("2020-01-06_090300_4.eml") == b"Subject: four\n\n"


def test_a_length_inside_an_entry_is_refused() -> None:
    data, ends = _unclosed_zip()
    with pytest.raises(ArchiveError, match="runs past"):
        read_local_entries(io.BytesIO(data), ends[1] - 10)
    with pytest.raises(ArchiveError, match="no zip entry"):
        read_local_entries(io.BytesIO(b"\0" * 64), 64)
