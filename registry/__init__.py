"""What diffbank keeps and where: the SQL catalog, object stores, publishing and gc."""
