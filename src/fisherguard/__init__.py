"""fisherguard: Fisher-information defenses against backdoors in non-IID federated learning."""

__version__ = "0.1.0"
