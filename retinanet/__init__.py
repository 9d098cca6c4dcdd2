"""RetinaNet (Lin et al., 2017) as a small, fast torch library. torch + torchvision only."""
from retinanet.backbones import BACKBONES
from retinanet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from retinanet.convert import from_torchvision
from retinanet.model import RetinaNet, RetinaNetConfig, build_model
from retinanet.runtime import Detector

__all__ = ["BACKBONES", "CheckpointError", "Detector", "RetinaNet", "RetinaNetConfig", "build_model",
           "from_torchvision", "load_checkpoint", "save_checkpoint"]
