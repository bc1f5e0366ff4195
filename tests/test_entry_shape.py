"""Every command-line script has the same entry shape: main(argv) parses through utils.parse_checked_args, so
--help works and a nonsense value is one `error:` line, before any work, whichever script it is."""
import ast
import importlib
import os

import pytest

from conftest import REPO

SCRIPTS = ['main_dino', 'eval_knn', 'eval_linear', 'eval_copy_detection', 'eval_image_retrieval',
           'eval_video_segmentation', 'visualize_attention', 'video_generation', 'benchmark', 'tools/export_backbone']
REQUIRED = {'video_generation': ['--input_path', 'video.mp4']}  # flags argparse itself insists on


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_and_a_bad_flag_value(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = importlib.import_module(name.replace('/', '.'))
    with pytest.raises(SystemExit) as exit_info:
        script.main(['--help'])
    assert exit_info.value.code == 0 and '--patch_size' in capsys.readouterr().out

    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        script.main(['--patch_size', '0', *REQUIRED.get(name, [])])
    assert exit_info.value.code == 'error: --patch_size must be at least 1, got 0'
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize('name', SCRIPTS)
def test_main_parses_through_utils_and_runs_under_main_guard(name):
    tree = ast.parse(open(os.path.join(REPO, f'{name}.py')).read())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == 'main')
    calls = {ast.unparse(node.func) for node in ast.walk(main) if isinstance(node, ast.Call)}
    assert 'utils.parse_checked_args' in calls
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
    assert [ast.unparse(statement) for statement in guard.body] == ['main()']


# the shared modules, each above the ones it may import; scripts may import any of them
MODULE_LAYERS = {'vision_transformer': set(), 'utils': {'vision_transformer'},
                 'imagedata': {'utils'}, 'multicrop': {'utils'}, 'checkpoints': {'utils'}, 'outputdir': {'utils'},
                 'evaluation': {'utils', 'imagedata', 'vision_transformer'}}


def local_imports(name):
    """The repository's modules that `name`.py imports, at any depth of its code."""
    tree = ast.parse(open(os.path.join(REPO, f'{name}.py')).read())
    local = set(SCRIPTS) | set(MODULE_LAYERS) | {'hubconf'}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & local


@pytest.mark.parametrize('name', sorted(MODULE_LAYERS))
def test_shared_modules_import_only_the_layers_below(name):
    assert local_imports(name) <= MODULE_LAYERS[name]


@pytest.mark.parametrize('name', SCRIPTS + ['hubconf'])
def test_scripts_import_modules_not_scripts(name):
    # benchmark times main_dino's own training step on main_dino's own objects
    allowed = set(MODULE_LAYERS) | ({'main_dino'} if name == 'benchmark' else set())
    assert local_imports(name) <= allowed
