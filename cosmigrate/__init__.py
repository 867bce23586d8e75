"""cosmigrate: live migration from Azure Cosmos DB for MongoDB to Amazon DocumentDB."""

__version__ = "0.1.0"
