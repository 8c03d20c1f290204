__version__ = "0.1.0"

import logging as _logging

class _QuietFallbacks(_logging.Filter):
    "transformers says, on import, that without torchvision its image processors fall back to PIL ones: diffedit_nb uses none of them, so the note is not the user's concern (only that message is held back)."
    def filter(self, record): return "requires torchvision (not installed)" not in record.getMessage()

_logging.getLogger("transformers.utils.import_utils").addFilter(_QuietFallbacks())  # the logger transformers will use: no transformers import here
