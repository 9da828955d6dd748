"""The language model: a fine-tuned transformer two-tower model over item text.

Item tower: a Hugging Face encoder over each item's text, mean-pooled, projected and
normalised. User tower: attention pooling over the vectors of the user's recent items,
light enough to run per request in numpy. Importing this package does not import
torch; the modules that need it do.
"""

from recsys.lm.config import LMConfig
from recsys.lm.text import item_texts

__all__ = ["LMConfig", "item_texts"]
