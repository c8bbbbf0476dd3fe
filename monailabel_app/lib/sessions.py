"""MONAI Label's sessions with archives extracted safely and session ids checked.

A session (``PUT /session/``) holds a volume sent for inference that is not in the
datastore: MONAI Label's Slicer plugin sends the shown volume this way
(``MONAILabelClient.create_session``), then runs ``/infer/<model>?session_id=<id>``.
MONAI Label's ``Sessions.add_session`` unpacks an upload sent with ``uncompress=true``
with ``shutil.unpack_archive``, which writes members named ``../x`` or ``/x`` wherever
they point (outside every folder the server owns, over a stored final label), follows
links and creates device files; its ``get_session``/``remove_session`` join the session
id from the URL into a path (``DELETE /session/..`` removes the session folder's parent).

:class:`CheckedSessions` (MONAI Label's ``Sessions``, created by the app's
``_load_sessions``) keeps every upstream behaviour except those:

- an archive (tar, with or without compression, or zip) is checked member by member
  before anything is written: no absolute names, no ``..``, no links, no device files or
  FIFOs, at most ``max_files`` members and ``max_bytes`` in total (the sizes the
  archive declares, and no member may write more than it declared). A refused
  archive is a 400 (413 for the bounds) naming the member; then the stdlib's own
  ``data`` extraction filter extracts it as a second line of defence;
- a session id from a request must be an id (``lib.requests.ID_RULE``; MONAI Label's are UUIDs):
  ``lib/routes.py`` checks it before MONAI Label's session endpoints and infer use it.

Nothing from a session reaches the datastore: inference on a session never saves
(``ICLSAM2App.infer`` saves only for datastore ids), and a session folder lies under
the session path, never under the studies folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from typing import Any

from monailabel.utils.sessions import Sessions

from lib.requests import http_error
from model_core.io.validation import InputError

logger = logging.getLogger(__name__)

__all__ = ["CheckedSessions", "extract_archive", "member_problem"]

#: file types a session's volume may have (those of datastore uploads)
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def member_problem(name: str) -> str | None:
    """Why an archive member's name may not be extracted, or None. Names use '/' in both tar and zip."""
    if not name or name in (".", "./"):
        return "has an empty name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute name"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "has a '..' in its name"
    if "\x00" in name:
        return "has a NUL character in its name"
    return None


def _refuse(name: str, problem: str, status: int = 400) -> InputError:
    shown = name if len(name) <= 200 else name[:200] + "..."
    return InputError(
        f"files: the archive member {shown!r} {problem}; nothing was extracted. An archive may hold only "
        "regular files and folders with relative names inside the archive.",
        status=status,
    )


def _bounds(count: int, total: int, name: str, max_files: int, max_bytes: int) -> None:
    if count > max_files:
        raise _refuse(
            name,
            f"is member number {count}: an archive may hold at most {max_files} members (--conf session_max_files)",
            status=413,
        )
    if total > max_bytes:
        raise _refuse(
            name,
            f"brings the archive's content to {total} bytes: at most {max_bytes} bytes are extracted "
            "(--conf session_max_mb)",
            status=413,
        )


def _tar_members(archive: tarfile.TarFile, max_files: int, max_bytes: int) -> list[tarfile.TarInfo]:
    members, total = [], 0
    for member in archive:  # one header at a time: a huge archive is refused before its data is read
        problem = member_problem(member.name)
        if problem is None and not (member.isreg() or member.isdir()):
            kind = (
                "a symbolic link"
                if member.issym()
                else "a hard link"
                if member.islnk()
                else "a FIFO"
                if member.isfifo()
                else "a device file"
                if member.isdev()
                else "not a regular file"
            )
            problem = f"is {kind}"
        if problem:
            raise _refuse(member.name, problem)
        total += member.size if member.isreg() else 0
        members.append(member)
        _bounds(len(members), total, member.name, max_files, max_bytes)
    return members


def _zip_members(archive: zipfile.ZipFile, max_files: int, max_bytes: int) -> list[zipfile.ZipInfo]:
    members, total = [], 0
    for member in archive.infolist():
        problem = member_problem(member.filename)
        kind = stat.S_IFMT(member.external_attr >> 16)  # Unix file type, if the writer stored one (0: none given)
        if problem is None and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            problem = "is a symbolic link" if kind == stat.S_IFLNK else "is not a regular file"
        if problem:
            raise _refuse(member.filename, problem)
        total += member.file_size
        members.append(member)
        _bounds(len(members), total, member.filename, max_files, max_bytes)
    return members


def extract_archive(path: str, folder: str, max_files: int, max_bytes: int) -> None:
    """Extract the tar or zip archive ``path`` into the existing ``folder``, or raise an InputError naming the member.

    Every member is checked before anything is written; tar members are then extracted with
    the stdlib's ``data`` filter, zip members by streaming at most their declared size.
    """
    if tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, "r:*") as archive:
                members = _tar_members(archive, max_files, max_bytes)
                archive.extractall(folder, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, tarfile.FilterError):  # the stdlib's filter found what the checks above did not
                member = getattr(e, "tarinfo", None)
                raise _refuse(member.name if member is not None else "?", f"is refused ({e})") from e
            raise InputError(f"files: the archive cannot be read ({type(e).__name__}: {e}).") from e
        return
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                for member in _zip_members(archive, max_files, max_bytes):
                    target = os.path.join(folder, *member.filename.replace("\\", "/").split("/"))
                    if member.is_dir():
                        os.makedirs(target, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with archive.open(member) as source, open(target, "xb") as out:
                        # ZipExtFile stops at the declared size and checks the CRC: a member cannot grow past its header
                        shutil.copyfileobj(source, out)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
            raise InputError(f"files: the archive cannot be read ({type(e).__name__}: {e}).") from e
        return
    raise InputError(
        "files: uncompress=true takes a tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) or zip archive; "
        "this upload is neither."
    )


class CheckedSessions(Sessions):
    """MONAI Label's ``Sessions`` with archives extracted by :func:`extract_archive`.

    Args:
        store_path, expiry: as for ``Sessions`` (``MONAI_LABEL_SESSION_PATH``, ``MONAI_LABEL_SESSION_EXPIRY``).
        max_files: most members an archive may hold.
        max_bytes: most bytes an archive may extract to.
    """

    def __init__(self, store_path: str = "", expiry: int = 3600, max_files: int = 10000, max_bytes: int = 2 << 30):
        super().__init__(store_path, expiry)
        self.max_files, self.max_bytes = int(max_files), int(max_bytes)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None):
        if not (uncompress and os.path.isfile(data_file)):
            return super().add_session(data_file, expiry, False, session_id)
        folder = tempfile.mkdtemp(prefix="session_")
        try:
            try:
                extract_archive(data_file, folder, self.max_files, self.max_bytes)
            except InputError as e:
                logger.info(f"Refused session archive: {e}")
                raise http_error(e) from e
            return super().add_session(folder, expiry, False, session_id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # moved into the session on success

    def volume(self, path: str) -> str:
        """The volume file of a session's image: the file itself, or the one volume file of an extracted folder.

        Raises:
            InputError: the folder holds no volume file, or more than one (400).
        """
        if os.path.isfile(path):
            return path
        found = []
        for root, _, files in os.walk(path):
            found += [os.path.join(root, f) for f in files if f.lower().endswith(VOLUME_EXTENSIONS)]
        if len(found) != 1:
            raise InputError(
                f"session_id: the session holds {len(found)} volume files ({list(VOLUME_EXTENSIONS)}); "
                "this app segments one volume per session: send the volume itself, or an archive of one."
            )
        return found[0]

    def owns(self, path: Any) -> bool:
        """Whether ``path`` lies in this store (a session's image)."""
        if not isinstance(path, str) or not os.path.isabs(path) or not os.path.exists(path):
            return False
        return os.path.realpath(path).startswith(os.path.realpath(self.store_path) + os.sep)
