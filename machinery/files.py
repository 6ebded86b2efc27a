"""Files written whole or not at all, and small files read without surprises: what every record, checkpoint and
figure goes through.
"""
import contextlib
import io
import os
import secrets
import stat


def atomic_write(path, write):
    """Writes `path` through write(binary_file), whole or not at all.

    The content is made in memory first, then written to a temporary file of this writer's own (a unique name in
    the same folder), fsynced and renamed over `path`: readers, a crash and a second process see the old file or
    the whole new one, never a part. Made in memory, a full disk shows as the OSError it is (ENOSPC); torch.save
    writing straight to a full disk fails with an unrelated RuntimeError."""
    content = io.BytesIO()
    write(content)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(content.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            error.filename, error.filename2 = str(path), None  # the file the caller asked for, not our temporary one
        raise


# The formats a figure may be saved in, by the extension of its file's name
FIGURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def save_figure(fig, path):
    """A matplotlib figure at `path`, in the format its extension names (FIGURE_FORMATS; PNG for any other), whole
    or not at all."""
    file_format = FIGURE_FORMATS.get(os.path.splitext(str(path))[1].lower(), "png")
    atomic_write(path, lambda f: fig.savefig(f, format=file_format, dpi=100, bbox_inches="tight"))


def read_small_file(path, limit):
    """The bytes of `path` if it is a plain file of at most `limit` bytes; OSError otherwise. A FIFO or a device
    (a link to /dev/zero, say) is refused without waiting on it or reading it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a plain file")
        if info.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        return f.read(limit + 1)[:limit]
