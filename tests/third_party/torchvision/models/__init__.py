from torchvision.models import inception  # noqa: F401
from torchvision.models.inception import Inception3, inception_v3  # noqa: F401
