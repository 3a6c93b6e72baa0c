"""Fine-tuning: one trainer core (``core``), the methods as small differences on it
(``methods``), data and augmentation (``data``), job storage (``checkpoint``), one job's
life cycle (``job``) and its evaluation (``evaluate``)."""
