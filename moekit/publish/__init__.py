"""Publishing to the Hugging Face Hub, with a generated model card.

write_model_card(model_dir, license=None, report=None) -> huggingface_hub.ModelCard
publish(model_dir, repo_id, private=False, revision=None, create_pr=False, license=None, dry_run=False) -> PublishResult
"""

from __future__ import annotations

from moekit.publish.card import model_card, validate_card, write_model_card
from moekit.publish.hub import PublishResult, publish

__all__ = ["PublishResult", "model_card", "publish", "validate_card", "write_model_card"]
