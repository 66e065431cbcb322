"""The one write-aside-then-rename helper: a write is complete or absent, and its temporary has the one name
scheme that the cleanup and the output-folder archive recognise."""

import os

import pytest

from research_files import abandoned_temporary, atomic_write, temporary_path, written_aside
from research_output import is_tool_output


def test_atomic_write_replaces_the_file_only_when_the_block_ends(tmp_path):
    target = tmp_path / 'results_final.json'
    target.write_text('old', encoding='utf-8')
    with atomic_write(str(target)) as fh:
        fh.write('new')
        assert target.read_text(encoding='utf-8') == 'old'           # written aside until the block ends
        assert os.path.exists(temporary_path(str(target)))
    assert target.read_text(encoding='utf-8') == 'new'
    assert os.listdir(tmp_path) == ['results_final.json']            # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'logits.npy'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with atomic_write(str(target), 'wb') as fh:
            fh.write(b'half')
            raise RuntimeError('killed mid-write')
    assert target.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['logits.npy']


def test_a_folder_written_aside_is_renamed_whole_or_removed(tmp_path):
    target = tmp_path / 'cache'
    with written_aside(str(target)) as tmp:
        os.makedirs(os.path.join(tmp, 'part'))
    assert os.path.isdir(target / 'part')
    with pytest.raises(OSError):
        with written_aside(str(target)) as tmp:       # a non-empty folder is in the way: the rename fails
            os.makedirs(os.path.join(tmp, 'other'))
    assert os.listdir(tmp_path) == ['cache'] and os.listdir(target) == ['part']


def test_the_one_temporary_scheme_is_what_cleanup_and_archive_recognise(tmp_path):
    name = os.path.basename(temporary_path(str(tmp_path / 'config.json')))
    assert is_tool_output(name) and is_tool_output('config.json')
    assert not is_tool_output('config.json.tmp') and not is_tool_output('notes.txt')
    assert not abandoned_temporary(name)              # this process still runs
