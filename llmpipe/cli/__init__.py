"""The ``llmpipe`` command: options (``parser``), files (``files``), model commands (``commands``),
archive listings (``listing``), and ``main``, which runs them."""
