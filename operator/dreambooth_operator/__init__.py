"""DreamBooth Operator: Kubernetes-native DreamBooth fine-tuning of Stable Diffusion."""

__version__ = "0.1.0"
