"""Empty: lucent.modelzoo does ``from torchvision.models import *``; no model is provided here."""

__all__: list[str] = []
