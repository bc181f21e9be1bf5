"""Publishing to the Hugging Face Hub, with a generated model card.

    write_model_card(model_dir, license=None, report=None) -> ModelCard   (moekit.publish.card)
    publish(model_dir, repo_id, ...) -> PublishResult
"""

from __future__ import annotations

from moekit.publish.card import write_model_card

__all__ = ["write_model_card"]
