"""Axolotl plugin: `lora_init: fisher` initializes LoRA/QLoRA adapters from Fisher statistics.

```yaml
plugins:
  - fisher_axolotl.FisherLoRAPlugin
lora_init: fisher
fisher_num_batches: 32   # any FisherConfig field as fisher_<field>
```
"""

from fisher_axolotl.args import FisherArgs, fisher_config
from fisher_axolotl.plugin import FisherLoRAPlugin

__all__ = ["FisherArgs", "FisherLoRAPlugin", "fisher_config"]
