"""Streaming multipart uploads: the ``file`` part goes to the backend as it arrives.

:class:`MultipartFileStream` is a read-only, non-seekable file object over the ``file``
part of a ``multipart/form-data`` request body. It reads the body in small chunks through
werkzeug's sans-IO :class:`~werkzeug.sansio.multipart.MultipartDecoder`, so the body is
never held whole in memory nor copied to another temporary file (``request.files`` would
do both). The production server has the body in ``TMPDIR`` already (``api.server`` spools
it beyond 256 KiB); the development server streams it from the socket. Memory per upload
is the backend's chunk or part size (docs/performance.md, "Upload memory"): a ``read(n)``
costs ``n`` once, and :func:`tune_allocator` makes glibc return such buffers when freed.
Limits are enforced while reading:

- at most ``max_bytes`` of body (counted as it streams, whatever ``Content-Length``
  said, or without one): 413;
- at most ``max_parts`` form parts: 413; each non-file field at most ``max_field_bytes``
  (413), and part headers, preamble and epilogue bounded likewise;
- exactly one ``file`` part (a file part, with a filename): 400 when missing or repeated;
- a body that ends before the closing boundary (client gone, truncated): 400.

The backend sees end-of-file only once the *whole* body has been read and checked, so a
request that fails any rule raises out of ``read()`` while the backend is still writing;
every backend's ``upload`` then leaves nothing at the final path (its contract). The
error is also kept in :attr:`MultipartFileStream.error`: backends translate exceptions
raised inside them (S3 into a ``StorageError``), and the view re-raises the original.
"""

from __future__ import annotations

import ctypes
import io
import os
from collections.abc import Iterator
from typing import IO, Any, NoReturn

from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.sansio.multipart import (
    Data,
    Epilogue,
    Field,
    File,
    MultipartDecoder,
    NeedData,
)

from api.errors import ApiError

#: Bytes read from the request body at a time.
READ_SIZE = 64 * 1024
#: The form field that carries the file.
FILE_FIELD = "file"


#: glibc maps allocations from this size up on their own (:func:`tune_allocator`).
MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def tune_allocator() -> bool:
    """Make glibc give every large buffer back to the system when it is freed.

    An upload goes through buffers of a part's size (8 MiB on S3, the chunk size on GCS),
    allocated and freed over and over by several threads. glibc serves such a buffer with
    its own ``mmap`` at first, but raises its threshold to the size of each one freed
    (dynamically, up to 32 MiB): from the second part on they come from the heap of the
    thread's arena, whose freed memory stays resident and fragments. Measured on the API
    server (docs/performance.md, "Upload memory"): +68 MiB RSS for one S3 upload instead
    of +43, and the RSS stayed at its peak afterwards. A fixed threshold keeps them mapped.

    Called once by the API server at start (``serve_api``). Does nothing when the
    ``MALLOC_MMAP_THRESHOLD_`` environment variable chose a threshold, or off glibc.
    Returns whether the threshold was set.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


class MultipartFileStream(io.RawIOBase):
    """The ``file`` part of a multipart body, streamed (see the module docstring).

    Call :meth:`start` first: it reads up to the start of the ``file`` part (400 when
    there is none), so that nothing is sent to storage for a form without a file.
    ``read(n)`` returns exactly ``n`` bytes until the end (s3transfer relies on it).
    """

    def __init__(
        self,
        body: IO[bytes],
        boundary: bytes,
        *,
        max_bytes: int,
        max_parts: int,
        max_field_bytes: int,
        read_size: int = READ_SIZE,
    ) -> None:
        super().__init__()
        self._body = body
        self._max_bytes = max_bytes
        self._max_field_bytes = max_field_bytes
        self._read_size = read_size
        # The decoder's buffer holds at most one chunk plus what it could not parse yet
        # (a part's headers, a partial boundary, the epilogue): bounded here.
        self._decoder = MultipartDecoder(
            boundary, max_form_memory_size=read_size + max_field_bytes, max_parts=max_parts
        )
        self._pending = bytearray()  # file bytes decoded but not yet read
        self._received = 0  # body bytes read from the request
        self._position = 0  # file bytes handed to the reader
        self._part: str | None = None  # "file", "field" or "skip" while inside a part
        self._field_size = 0
        self._file_seen = False
        self._finished = False  # the closing boundary was seen and the body is over
        self.filename: str | None = None
        #: The first error raised, re-raised by every later call.
        self.error: ApiError | None = None

    # -- io.RawIOBase ----------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        """File bytes returned so far (google-resumable-media asks)."""
        return self._position

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (fewer bytes only at the end), straight from the decoder."""
        view = memoryview(buffer).cast("B")
        filled = 0
        with view:
            for piece in self._pieces(len(view)):
                view[filled : filled + len(piece)] = piece
                filled += len(piece)
        return filled

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes of the file, fewer only at its end; all of it for -1.

        The result is built in a :class:`io.BytesIO`, whose ``getvalue()`` hands over its
        buffer without a copy: a read costs its own size once (plus one body chunk), not
        twice or three times (a bytearray of it, a slice of that, bytes of the slice):
        s3transfer reads whole parts, and once read the whole first 64 MiB this way.
        """
        out = io.BytesIO()
        for piece in self._pieces(None if size is None or size < 0 else size):
            out.write(piece)
        return out.getvalue()

    def _pieces(self, want: int | None) -> Iterator[memoryview]:
        """Up to ``want`` file bytes (all for None) in the pieces the decoder gives,
        each valid until the next one is asked for; the read position moves on."""
        self._check()
        while want is None or want > 0:
            if not self._pending:
                if self._finished:
                    return
                self._pull()
                continue
            take = len(self._pending) if want is None else min(want, len(self._pending))
            with memoryview(self._pending) as view, view[:take] as piece:
                yield piece
            del self._pending[:take]
            self._position += take
            if want is not None:
                want -= take

    def readall(self) -> bytes:
        return self.read(-1)

    # -- the form ----------------------------------------------------------------------
    @property
    def received(self) -> int:
        """Body bytes read from the request so far."""
        return self._received

    def start(self) -> None:
        """Read up to the beginning of the ``file`` part's data (400 when there is none)."""
        self._check()
        while not self._file_seen and not self._finished:
            self._pull()
        if not self._file_seen:
            self._fail(
                ApiError(
                    400,
                    "bad_request",
                    f"the multipart field {FILE_FIELD!r} is missing: send the file's bytes as "
                    f"a file part named {FILE_FIELD!r} (curl: -F {FILE_FIELD}=@backup.tar.gz; "
                    f'-F {FILE_FIELD}="text" sends a text field, not a file)',
                )
            )

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _fail(self, error: ApiError) -> NoReturn:
        self.error = error
        raise error

    def _pull(self) -> None:
        """Read one chunk of the body and decode what it completes."""
        try:
            chunk = self._body.read(self._read_size)
        except RequestEntityTooLarge:
            self._fail(too_large(f"the body is limited to {self._max_bytes} bytes"))
        except ClientDisconnected:
            self._fail(ApiError(400, "incomplete_body", "the client sent less than it announced"))
        except HTTPException as err:
            code = (err.name or "bad request").lower().replace(" ", "_")
            self._fail(ApiError(err.code or 400, code, str(err.description)))
        except OSError as err:
            self._fail(ApiError(400, "incomplete_body", f"reading the body failed: {err}"))
        if chunk:
            self._received += len(chunk)
            if self._received > self._max_bytes:
                self._fail(too_large(f"the body is limited to {self._max_bytes} bytes"))
        try:
            self._decoder.receive_data(chunk or None)
            self._events()
        except RequestEntityTooLarge:
            self._fail(too_large("too many form parts, or a form field or header too large"))
        except (ValueError, AttributeError, IndexError, KeyError) as err:
            # ValueError: truncated or malformed (the decoder's own), undecodable
            # headers; the others: input odd enough to trip the decoder's assumptions
            message = "incomplete" if not chunk else "malformed"
            self._fail(ApiError(400, "bad_request", f"{message} multipart body: {err}"))

    def _events(self) -> None:
        while True:
            event = self._decoder.next_event()
            if isinstance(event, NeedData):
                return
            if isinstance(event, Epilogue):
                self._finished = True
                return
            if isinstance(event, File) and event.name == FILE_FIELD:
                if self._file_seen:
                    self._fail(ApiError(400, "bad_request", f"more than one {FILE_FIELD!r} part"))
                self._file_seen = True
                self.filename = event.filename
                self._part = "file"
            elif isinstance(event, Field):
                self._part, self._field_size = "field", 0
            elif isinstance(event, File):
                self._part = "skip"  # another file part: counted in the body limit only
            elif isinstance(event, Data):
                self._data(event)

    def _data(self, event: Data) -> None:
        if self._part == "file":
            self._pending += event.data
        elif self._part == "field":
            self._field_size += len(event.data)
            if self._field_size > self._max_field_bytes:
                self._fail(too_large(f"form fields are limited to {self._max_field_bytes} bytes"))
        if not event.more_data:
            self._part = None
