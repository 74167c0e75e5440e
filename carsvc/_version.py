# This file MUST NOT contain anything but the __version__ assignment: setup
# tooling reads it.
__version__ = "0.1.0"
