"""Age estimation from face images. Knows nothing of Ray: usable in a notebook, a test or a Serve replica."""

__version__ = "0.1.0"
