"""The entries of a zip that was never closed, read from their local headers.

A zip's directory comes last; a writer killed before it leaves entries nobody can
list. zipfile, writing to a seekable file, goes back after each entry and puts its
final CRC and sizes into the entry's local header, so the complete entries up to a
known length can be listed from those headers alone. popbox.archive.export does so
to resume an eml-zip export, and hands the list to a new ZipFile that writes the
directory for them and for what it adds.
"""

from __future__ import annotations

import struct
import zipfile
from typing import BinaryIO, Final

from popbox.errors import ArchiveError

__all__ = ["read_local_entries"]

# APPNOTE.TXT 4.3.7: the local file header, and 4.5.3: the ZIP64 extra field.
_LOCAL_HEADER: Final = struct.Struct("<4sHHHHHLLLHH")
_LOCAL_SIGNATURE: Final = b"PK\x03\x04"
_ZIP64_EXTRA_ID: Final = 0x0001
_UTF8_NAME_FLAG: Final = 0x0800
_DATA_DESCRIPTOR_FLAG: Final = 0x0008
_MAX_32: Final = 0xFFFFFFFF
# What zipfile gives every entry it writes (its _open_to_write): rw for the owner.
_DEFAULT_ATTRIBUTES: Final = 0o600 << 16


def read_local_entries(fp: BinaryIO, end: int) -> list[zipfile.ZipInfo]:
    """The entries stored in ``fp`` from its start up to exactly ``end``.

    ArchiveError if what is there is not one complete entry after another.
    """
    infos: list[zipfile.ZipInfo] = []
    position = 0
    while position < end:
        fp.seek(position)
        raw = fp.read(_LOCAL_HEADER.size)
        if len(raw) < _LOCAL_HEADER.size:
            raise ArchiveError(f"the zip ends inside an entry's header at {position}")
        (signature, version, flags, method, dos_time, dos_date, crc, compressed, size,
         name_length, extra_length) = _LOCAL_HEADER.unpack(raw)  # fmt: skip
        if signature != _LOCAL_SIGNATURE:
            raise ArchiveError(f"no zip entry where one should start, at {position}")
        if flags & _DATA_DESCRIPTOR_FLAG:
            raise ArchiveError(f"the zip entry at {position} has no sizes in its header")
        name = fp.read(name_length)
        extra = fp.read(extra_length)
        if len(name) != name_length or len(extra) != extra_length:
            raise ArchiveError(f"the zip ends inside an entry's header at {position}")
        if compressed == _MAX_32 or size == _MAX_32:
            size, compressed = _zip64_sizes(extra, size, compressed, position)
        info = zipfile.ZipInfo(
            name.decode("utf-8" if flags & _UTF8_NAME_FLAG else "cp437"),
            _dos_moment(dos_date, dos_time),
        )
        info.flag_bits = flags
        info.compress_type = method
        info.CRC = crc
        info.compress_size = compressed
        info.file_size = size
        info.header_offset = position
        info.extra = extra
        info.extract_version = max(info.extract_version, version)
        info.external_attr = _DEFAULT_ATTRIBUTES
        infos.append(info)
        position += _LOCAL_HEADER.size + name_length + extra_length + compressed
    if position != end:
        raise ArchiveError(f"the zip's last entry runs past {end} octets")
    return infos


def _zip64_sizes(extra: bytes, size: int, compressed: int, position: int) -> tuple[int, int]:
    offset = 0
    while offset + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, offset)
        body = extra[offset + 4 : offset + 4 + length]
        if field_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if size == _MAX_32 and values:
                size = values.pop(0)
            if compressed == _MAX_32 and values:
                compressed = values.pop(0)
            return size, compressed
        offset += 4 + length
    raise ArchiveError(f"the zip entry at {position} lacks its ZIP64 sizes")


def _dos_moment(dos_date: int, dos_time: int) -> tuple[int, int, int, int, int, int]:
    return (
        (dos_date >> 9) + 1980,
        (dos_date >> 5) & 0x0F,
        dos_date & 0x1F,
        dos_time >> 11,
        (dos_time >> 5) & 0x3F,
        (dos_time & 0x1F) * 2,
    )
