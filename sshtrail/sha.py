"""sha256 without importing hashlib, which loads OpenSSL: a few ms of every PAM call."""
try:
    from _sha256 import sha256  # noqa: F401  (Python 3.11)
except ImportError:
    try:
        from _sha2 import sha256  # noqa: F401  (Python 3.12+)
    except ImportError:
        from hashlib import sha256  # noqa: F401
