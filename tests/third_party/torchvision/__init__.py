"""A stand-in for torchvision: only what pytorch-fid 0.3.0 imports (see ../README.md).

torchvision's wheels from the package registry do not import beside the CPU build of torch
2.13.0 that the test extra pins ("operator torchvision::nms does not exist"); pytorch-fid only
needs torchvision's Inception-v3 classes, which are pure torch and copied in models/inception.py.
"""
__version__ = "0.28.0"  # the version models/inception.py is copied from (pytorch-fid reads it)

from torchvision import models  # noqa: E402,F401
from torchvision import transforms  # noqa: E402,F401
