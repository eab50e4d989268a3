"""Engines: one round (``round``) driven in process (``runner``) or on Flower (``flower``)."""
