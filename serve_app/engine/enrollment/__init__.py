"""Voice enrollment (reference clip -> Conditionals), a bounded voice LRU, and conds.pt storage. Plain torch."""
from .cache import VoiceCache
from .enroller import VoiceEnroller
from .storage import load_conds, save_conds

__all__ = ["VoiceEnroller", "VoiceCache", "save_conds", "load_conds"]
