"""What the test files share, besides conftest.py's fixtures: tiny configs, the command line in a
subprocess, the README's commands, a training run stopped after a checkpoint, tree equality.

    from helpers import run_cli, tiny_config
"""

from helpers.commands import (REPO, USER_XLA_FLAGS, cli_argv, free_port, readme_commands,
                              run_as_typed, run_cli, run_cli_json)
from helpers.configs import (FINETUNE_PRIOR, FINETUNE_RUN, SHAPES_SIZES, SHORT_RUN,
                             SMALL_BASE_NET, config_flags, data_config, fake_tokenize,
                             short_run_config, short_run_settings, stage_config, tiny_config,
                             train_tiny_stage)
from helpers.stop_after_checkpoint import start_stopping_after_checkpoint
from helpers.trees import assert_trees_equal
