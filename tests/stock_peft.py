"""Run by tests with `python -I`: the fine-tune through stock transformers + PEFT only (moekit never imported).

    python -I tests/stock_peft.py MOE ADAPTER IDS.pt OUT.pt [--trust-remote-code]

Writes the logits for the token ids in IDS.pt to OUT.pt and prints one JSON line: whether moekit got imported,
the names of the modules PEFT adapted, and the adapter tensors that PEFT holds.
"""

import json
import sys

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

moe, adapter, ids, out = sys.argv[1:5]
trust_remote_code = "--trust-remote-code" in sys.argv
model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32, trust_remote_code=trust_remote_code)
model = PeftModel.from_pretrained(model, adapter)
model.eval()
with torch.no_grad():
    logits = model(input_ids=torch.load(ids)).logits
torch.save(logits, out)
report = {
    "moekit_imported": any(name.split(".")[0] == "moekit" for name in sys.modules),
    "adapted": sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer)),
    "tensors": len(get_peft_model_state_dict(model)),
}
print(json.dumps(report))
