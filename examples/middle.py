"""A readout in your own file: disc on the state after decoder layer --read_layer, its head trained at its own
learning rate --middle_head_lr. Name the file with --readout_file in every script:

    python ablate.py --model tiny --data toy --modalities t --readout_file examples/middle.py \
        --readouts disc,middle --read_layer 1
    python eval.py --readout_file examples/middle.py --ckpt runs/toy-readouts-ablation/middle-t-s0-*
"""

from readout import READOUTS, Disc, at_last_token
from settings import Setting


class Middle(Disc):
    # disc's settings but --head_lr, which its param_groups does not read (so --help does not list it here)
    settings = tuple(s for s in Disc.settings if s.name != "head_lr") + (
        Setting("read_layer", int, 1, "the decoder layer read (0: the embeddings)"),
        Setting("middle_head_lr", float, 1e-2, "the head's peak learning rate"),
    )

    def pooled(self, batch):
        out = self.hidden_states(batch["inputs"], output_hidden_states=True)  # every layer's
        h = out.hidden_states[self.cfg.read_layer]
        return at_last_token(h, batch["inputs"]["attention_mask"]).float()

    def param_groups(self, lr):  # LoRA at --lr, the head at its own rate
        lora = [p for p in self.backbone.parameters() if p.requires_grad]
        return [(lora, lr), (list(self.head.parameters()), self.cfg.middle_head_lr)]


READOUTS["middle"] = Middle
