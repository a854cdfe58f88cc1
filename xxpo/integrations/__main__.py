"""``python -m xxpo.integrations`` prints the equivalents table that ``book/_generated/integrations_table.md`` holds."""

from xxpo.integrations import equivalents_markdown

print(equivalents_markdown(), end="")
