"""Pages and pictures for the report stage: the document model (markdown and HTML) and its figures."""
